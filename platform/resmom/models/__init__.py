"""Backbones and projection heads."""
