"""The pure core: QSR settings and their checks, the round schedules and clock, the communication accounting,
logging and lr-scheduler helpers. Nothing here calls torch.distributed."""
