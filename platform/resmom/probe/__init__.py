"""Probes of representation quality: the kNN monitor."""
