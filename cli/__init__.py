"""The ``spade`` command line (installed as the ``spade_deploy.cli`` package)."""
