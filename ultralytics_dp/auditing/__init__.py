"""Empirical privacy auditing: a lower bound on epsilon from one private training run.

``bound`` turns canary guesses into a lower bound (Steinke, Nasr and Jagielski 2023), ``canaries``
holds the gradient-space canaries a run adds to its private steps, and ``run`` drives one audited
run through the same trainer path a user's run takes (``yolo-dp audit``, ``ultralytics_dp.audit``).
"""
