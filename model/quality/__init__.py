"""Restoration quality: the paper's metrics, the eval loop and its report (osdface eval)."""
