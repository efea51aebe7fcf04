"""Running a job's model on a cluster: the Ray Data runner (`ray_runner.py`). Imported only with --ray."""
