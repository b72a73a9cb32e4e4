"""`osdface eval`: the paper's quality metrics (identity, IQA, FID, landmarks), the eval loop
over aligned faces or a running service, its report, and the degradation of HQ sets.

Evaluation sits above `model/` and `train/`: it scores what the restorer makes and reuses the
training side's ArcFace network and degradation model.
"""
