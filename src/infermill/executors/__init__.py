"""Executors start a job's workers and wait for them; they hold no job state (that is the
queue's). ``local``: worker processes on this machine."""

#: the executors ``infermill run --executor`` takes: local processes, a Slurm array, Ray tasks
EXECUTORS = ("local", "slurm", "ray")
