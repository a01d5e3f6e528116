"""Metrics: FID/KID, CLIPScore and preference-model adapters, DSG/TIFA scoring, preference accuracy.

Submodules are imported lazily so that reading preference files does not import torch models.
"""
