"""Reference runs: the paper's weight-tied, augmented and regularized MLPs on real MNIST digits.

``catalog`` is what the service uses (listing, cards, model files, closest profile, retraining);
``reproduce`` trains and audits the six runs and writes ``audit_service/reference/runs/`` and ``docs/reference.md``.
"""
