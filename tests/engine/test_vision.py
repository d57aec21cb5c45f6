"""The image backbone: trunk + tail equals the packaged network, BatchNorm folding keeps features."""

import copy

import torch

from engine.vision import TRUNK_BLOCKS, ImageBackbone


def test_trunk_tail_and_folding_match_the_packaged_network():
    torch.manual_seed(0)
    backbone = ImageBackbone()
    x = torch.randn(3, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        fmap = backbone.net.extract_features(x)  # the package's own forward
        ref = torch.cat([fmap.mean(dim=(2, 3)), fmap.amax(dim=(2, 3))], dim=1)
        assert torch.equal(backbone(x), ref)
        assert backbone.trunk(x).shape == (3, 192, 7, 7)

        tuned = copy.deepcopy(backbone.tail_net)  # stands in for a bundle's tuned tail
        tuned.conv_head.weight.mul_(1.5)
        before = {k: v.clone() for k, v in tuned.state_dict().items()}
        backbone.use_tail(tuned)
        unfused = backbone(x)
        assert not torch.allclose(unfused, ref)
        fused = backbone.fuse_batchnorm()(x)
    torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-4)
    # folding worked on a copy: the tuned tail's own weights (and BatchNorms) are untouched
    after = tuned.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    used = [backbone.net._bn0, *backbone.net._blocks[:TRUNK_BLOCKS], backbone.tail_net]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for u in used for m in u.modules())
