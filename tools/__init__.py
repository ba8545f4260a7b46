"""Shared package of the chest X-ray failure-analysis suite (research use only, not for clinical use)."""
