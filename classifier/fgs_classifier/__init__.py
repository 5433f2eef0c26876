"""fgs_classifier: the team's classifier as fgs reads it.

Loading an uploaded TorchScript / torch.export archive with its spec (`registry`), the check the API runs on
an upload (`check`), the hardness statistics (`hardness_stats`) and a reference small CNN with its export
(`small_cnn`). Imported by the worker (serving) and by the client's training extra; needs torch, never FastAPI.
"""
