"""Datasets, FFCV `.beton` writing and loading, and two-view augmentation."""
