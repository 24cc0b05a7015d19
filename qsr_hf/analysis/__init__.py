"""Analysis tools, pure Python: the sync planner, the lr replay, the wall-clock model and the K-worker simulation.

Nothing here runs a collective; only the simulation (`simulation`, `data_parallel`, `sharding`) imports torch.
"""
