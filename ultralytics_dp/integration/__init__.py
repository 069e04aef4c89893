"""Everything that touches Ultralytics' trainer: the import hooks and DP keys (``hooks``, ``keys``,
``plugin``), the callbacks (``adapter``), the private step (``private_step``), what the trainer
may do (``guard``), the DP defaults (``recipe``), the checkpoint entry (``checkpoint``), the
training-set checks (``training_set``), the normalisation swap (``norms``), the offline switches
(``offline``) and ``privacy.png`` (``privacy_plot``). Imports nothing here: the start-up file
loads ``plugin`` through it.
"""
