"""The training loop that each DDP worker runs, and its schedules."""
