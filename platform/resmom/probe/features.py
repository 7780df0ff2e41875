"""Backbone features of a whole split, for the kNN monitor and the linear probe."""

from __future__ import annotations

import torch
from torch import nn

from resmom import distributed as dist_utils
from resmom.data.augment import normalize
from resmom.data.loaders import keep_torch_threads
from resmom.data.registry import DatasetInfo


@torch.no_grad()
def extract_features(
    backbone: nn.Module, loader, info: DatasetInfo
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (N, F) features and (N,) labels of this rank's shard, gathered from all ranks.

    The backbone runs in eval mode (BatchNorm running statistics) and is put
    back into the mode it was in.
    """
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    for images, targets in keep_torch_threads(loader):
        features.append(backbone(normalize(images, info.mean, info.std)).float())
        labels.append(targets.long())
    backbone.train(was_training)
    local_features = torch.cat(features)
    local_labels = torch.cat(labels)
    return dist_utils.all_gather_rows(local_features), dist_utils.all_gather_rows(local_labels)
