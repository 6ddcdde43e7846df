import torch


class PoolingEncoder(torch.nn.Module):
    def __init__(self, mix: torch.Tensor):
        super().__init__()
        self.mix = torch.nn.Parameter(mix.float(), requires_grad=False)  # [4, 3]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, H, W, 3]`` in [0, 1] -> ``[B, 4, H/8, W/8]``."""
        x = images.movedim(-1, 1)
        pooled = torch.nn.functional.avg_pool2d(x, 8)
        return torch.einsum("kc,bchw->bkhw", self.mix, pooled)


class VAE:
    latent_dim = 2
    latent_channels = 4

    def __init__(self, sd=None, metadata=None, **_):
        self.first_stage_model = PoolingEncoder(sd["mix"])

    def throw_exception_if_invalid(self):
        return None

    def spacial_compression_encode(self):
        return 8

    def encode(self, pixels):
        return self.first_stage_model(pixels.float())
