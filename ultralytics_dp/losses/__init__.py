"""Per-image losses of Ultralytics' tasks, each equal to Ultralytics' own loss for that image in a
batch of one: detection, oriented boxes and classification (``per_image``), the mask terms
(``segment``), the keypoint terms (``pose``), and slicing a batch into chunks (``batch``). Imports
Ultralytics' loss code, never the trainer glue (``integration``).
"""

# the Ultralytics tasks (``args.task``) with a per-image loss here: every other task is refused
TASKS = ("detect", "obb", "segment", "pose", "classify")
