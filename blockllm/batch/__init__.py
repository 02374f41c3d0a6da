"""Batch inference over Dask collections and batch jobs over files, at low priority on the block hosts."""

from .api import generate_bag, generate_dataframe, generate_list
from .jobs import JobRunningError, cancel_job, job_status, list_jobs, read_output, submit_job

__all__ = [
    "JobRunningError",
    "cancel_job",
    "generate_bag",
    "generate_dataframe",
    "generate_list",
    "job_status",
    "list_jobs",
    "read_output",
    "submit_job",
]
