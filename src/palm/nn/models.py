"""The model registry: ``model`` in params.yaml -> a network with one PM logit per image.

:data:`MODELS` holds one :class:`ModelSpec` per network: everything known about it (its
builder, its Grad-CAM layer, the arguments params.yaml may tune). Every list of model names
is derived from it (:func:`model_names`; ``palm.core.params.MODEL_NAMES`` is tested against it).

Every builder is called with ``image_size`` and returns a ``paddle.nn.Layer`` mapping float32
NCHW images in [-1, 1] to logits of shape (N, 1). Only LeNet and AlexNet, whose first fully
connected layer depends on it, use ``image_size``; the others end in an adaptive pool and
take any size. GoogLeNet in training mode returns ``(main, aux1, aux2)``; use
:func:`training_loss` and :func:`main_logits` to handle both.

| name | built from |
|---|---|
| lenet | by hand: the course's LeNet (sigmoid, 5x5 convolutions) |
| alexnet | by hand: the course's AlexNet, fc size following ``image_size`` |
| vgg16 | ``paddle.vision.models.vgg16`` (with batch norm by default) |
| googlenet | by hand: GoogLeNet (Inception v1) as in the paper, with both auxiliary classifiers |
| resnet50/101/152 | ``paddle.vision.models.resnet50/101/152`` |
| senet18 | ``paddle.vision.models.ResNet`` with an SE basic block (SE-ResNet18) |
| mobilenetv3_small, mobilenetv3_large | ``paddle.vision.models.mobilenet_v3_small/large`` (Howard et al. 2019) |
| shufflenetv2 | ``paddle.vision.models.shufflenet_v2_x1_0`` (Ma et al. 2018) |

The last three are not in the course: efficient networks (0.06-0.22 GFLOPs at 224 px against
ResNet50's 4.1) whose low cost per image buys resolution on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import paddle
import paddle.nn as nn
from paddle.vision import models as pvm
from paddle.vision.models.resnet import BasicBlock

AUX_WEIGHT = 0.3


def _flat_size(features: nn.Layer, image_size: int) -> int:
    """Number of features after ``features`` for one image of ``image_size`` px."""
    with paddle.no_grad():
        was_training = features.training
        features.eval()
        n = int(paddle.flatten(features(paddle.zeros([1, 3, image_size, image_size])), 1).shape[1])
        features.train(was_training)
    return n


class LeNet(nn.Sequential):
    """The course's LeNet for 3-channel fundus images.

    conv 5x5 (6) -> sigmoid -> maxpool 2 -> conv 5x5 (16) -> sigmoid -> maxpool 2 ->
    conv 4x4 (120) -> sigmoid -> flatten -> fc 64 -> sigmoid -> fc 1.
    Sigmoid activations and no normalisation make it learn poorly at 224 px (the course
    reports it predicting PM for every image); it is kept faithful on purpose.
    """

    def __init__(self, image_size: int = 224):
        features = nn.Sequential(
            nn.Conv2D(3, 6, 5),
            nn.Sigmoid(),
            nn.MaxPool2D(2, 2),
            nn.Conv2D(6, 16, 5),
            nn.Sigmoid(),
            nn.MaxPool2D(2, 2),
            nn.Conv2D(16, 120, 4),
            nn.Sigmoid(),
        )
        n = _flat_size(features, image_size)
        super().__init__(features, nn.Flatten(), nn.Linear(n, 64), nn.Sigmoid(), nn.Linear(64, 1))

    @property
    def features(self) -> nn.Layer:
        """The convolutional stage (a name for it: the state dict keeps its ``0.`` keys)."""
        return self[0]


class AlexNet(nn.Sequential):
    """The course's AlexNet: conv 11x11/4 (96), pool, 5x5 (256), pool, 3x3 (384, 384, 256),
    pool, fc 4096, dropout 0.5, fc 4096, dropout 0.5, fc 1, with ReLU.

    ``paddle.vision.models.AlexNet`` fixes the first fc to 256x6x6 inputs (224 px only), so
    it is written here with the fc size computed from ``image_size``.
    """

    def __init__(self, image_size: int = 224, dropout: float = 0.5):
        features = nn.Sequential(
            nn.Conv2D(3, 96, 11, stride=4, padding=5),
            nn.ReLU(),
            nn.MaxPool2D(2, 2),
            nn.Conv2D(96, 256, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2D(2, 2),
            nn.Conv2D(256, 384, 3, padding=1),
            nn.ReLU(),
            nn.Conv2D(384, 384, 3, padding=1),
            nn.ReLU(),
            nn.Conv2D(384, 256, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2D(2, 2),
        )
        n = _flat_size(features, image_size)
        super().__init__(
            features,
            nn.Flatten(),
            nn.Linear(n, 4096),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(4096, 1),
        )

    @property
    def features(self) -> nn.Layer:
        """The convolutional stage (a name for it: the state dict keeps its ``0.`` keys)."""
        return self[0]


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, batch_norm: bool = True):
        layers = [nn.Conv2D(cin, cout, k, stride=stride, padding=k // 2, bias_attr=not batch_norm)]
        if batch_norm:
            layers.append(nn.BatchNorm2D(cout))
        super().__init__(*layers, nn.ReLU())


class Inception(nn.Layer):
    """Inception module (Szegedy et al. 2015): 1x1 | 1x1->3x3 | 1x1->5x5 | pool->1x1, each with ReLU."""

    def __init__(self, cin, c1, c3r, c3, c5r, c5, proj, batch_norm=True):
        super().__init__()
        self.b1 = ConvBNReLU(cin, c1, 1, batch_norm=batch_norm)
        self.b3 = nn.Sequential(
            ConvBNReLU(cin, c3r, 1, batch_norm=batch_norm), ConvBNReLU(c3r, c3, 3, batch_norm=batch_norm)
        )
        self.b5 = nn.Sequential(
            ConvBNReLU(cin, c5r, 1, batch_norm=batch_norm), ConvBNReLU(c5r, c5, 5, batch_norm=batch_norm)
        )
        self.bp = nn.Sequential(nn.MaxPool2D(3, 1, padding=1), ConvBNReLU(cin, proj, 1, batch_norm=batch_norm))

    def forward(self, x):
        return paddle.concat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], axis=1)


class AuxHead(nn.Sequential):
    """The paper's auxiliary classifier: avg pool to 4x4 (5x5/3 on 14x14 at 224 px), 1x1 conv 128,
    fc 1024, dropout 0.7, fc 1."""

    def __init__(self, cin: int):
        super().__init__(
            nn.AdaptiveAvgPool2D(4),
            ConvBNReLU(cin, 128, 1, batch_norm=False),
            nn.Flatten(),
            nn.Linear(128 * 16, 1024),
            nn.ReLU(),
            nn.Dropout(0.7),
            nn.Linear(1024, 1),
        )


class GoogLeNet(nn.Layer):
    """GoogLeNet (Inception v1) as in the paper, with its two auxiliary classifiers (on 4a and
    4d) whose losses are weighted 0.3 in training (:func:`training_loss`); in eval mode only
    the main output is returned.

    Differences from the paper: batch norm after each convolution (``batch_norm=True``, the
    default), which trains from scratch far more stably than the original (the course's
    version, with neither aux heads nor ReLU after each convolution, swung between 54% and
    94%); no local response normalisation (superseded by batch norm). With
    ``batch_norm=False`` the paper's conv+ReLU units are used.
    ``paddle.vision.models.GoogLeNet`` is not used: it has no ReLU after its convolutions
    and its aux heads only fit 224 px inputs.
    """

    def __init__(self, image_size: int = 224, batch_norm: bool = True):
        super().__init__()
        bn = batch_norm
        pool = lambda: nn.MaxPool2D(3, 2, padding=1)  # noqa: E731
        self.stem = nn.Sequential(
            ConvBNReLU(3, 64, 7, stride=2, batch_norm=bn),
            pool(),
            ConvBNReLU(64, 64, 1, batch_norm=bn),
            ConvBNReLU(64, 192, 3, batch_norm=bn),
            pool(),
            Inception(192, 64, 96, 128, 16, 32, 32, bn),
            Inception(256, 128, 128, 192, 32, 96, 64, bn),
            pool(),
            Inception(480, 192, 96, 208, 16, 48, 64, bn),
        )
        self.mid = nn.Sequential(
            Inception(512, 160, 112, 224, 24, 64, 64, bn),
            Inception(512, 128, 128, 256, 24, 64, 64, bn),
            Inception(512, 112, 144, 288, 32, 64, 64, bn),
        )
        self.tail = nn.Sequential(
            Inception(528, 256, 160, 320, 32, 128, 128, bn),
            pool(),
            Inception(832, 256, 160, 320, 32, 128, 128, bn),
            Inception(832, 384, 192, 384, 48, 128, 128, bn),
            nn.AdaptiveAvgPool2D(1),
            nn.Flatten(),
            nn.Dropout(0.4),
            nn.Linear(1024, 1),
        )
        self.aux1 = AuxHead(512)
        self.aux2 = AuxHead(528)

    @property
    def inception5b(self) -> nn.Layer:
        """The last Inception block (the paper's 5b), the last convolutional stage."""
        return self.tail[3]

    def forward(self, x):
        a = self.stem(x)
        b = self.mid(a)
        out = self.tail(b)
        if self.training:
            return out, self.aux1(a), self.aux2(b)
        return out


class SEBasicBlock(BasicBlock):
    """ResNet basic block with squeeze-and-excitation (Hu et al. 2018, reduction 16) on the
    residual branch, before the addition."""

    def __init__(
        self,
        inplanes,
        planes,
        stride=1,
        downsample=None,
        groups=1,
        base_width=64,
        dilation=1,
        norm_layer=None,
        reduction: int = 16,
    ):
        super().__init__(inplanes, planes, stride, downsample, groups, base_width, dilation, norm_layer)
        self.se = nn.Sequential(
            nn.AdaptiveAvgPool2D(1),
            nn.Conv2D(planes, planes // reduction, 1),
            nn.ReLU(),
            nn.Conv2D(planes // reduction, planes, 1),
            nn.Sigmoid(),
        )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out * self.se(out)
        return self.relu(out + identity)


def senet18(image_size: int = 224) -> nn.Layer:
    """SE-ResNet18: ResNet18 ([2, 2, 2, 2] basic blocks) with an SE module on every block.

    The stem is the standard ImageNet one (7x7/2 convolution + 3x3/2 max pool), not the
    course's CIFAR stem (3x3/1, no pool): at 224 px the CIFAR stem keeps 224x224 feature maps
    in the first stage instead of 56x56, i.e. about 16x the compute in every layer, for no
    gain on these large, smooth images.
    """
    return pvm.ResNet(SEBasicBlock, 18, num_classes=1)


def vgg16(image_size: int = 224, batch_norm: bool = True) -> nn.Layer:
    """VGG16 (``paddle.vision.models.vgg16``). Batch norm (on by default) makes it train from
    scratch in a few epochs; the plain VGG16 needs a small learning rate and many epochs."""
    return pvm.vgg16(batch_norm=batch_norm, num_classes=1)


@dataclass(frozen=True)
class ModelSpec:
    """Everything known about one network."""

    build: Callable[..., nn.Layer]
    """``build(image_size=..., **tunable)`` -> the network."""
    gradcam_layer: str
    """The name (attribute of the network) of the layer whose output feature maps Grad-CAM
    explains: the last convolutional stage."""
    tunable: tuple[str, ...] = ()
    """Builder arguments that ``models.<name>`` in params.yaml may set (e.g. ``dropout``)."""


def _paddle(factory: Callable[..., nn.Layer]) -> Callable[..., nn.Layer]:
    """A ``paddle.vision.models`` builder with one output; it takes any side (adaptive pooling)."""
    return lambda image_size=224, **kw: factory(num_classes=1, **kw)


#: batch-norm momentum of the MobileNetV3s: paddle.vision.models gives them 0.99 (running statistics
#: that move 1% a step, made for ImageNet's hundreds of thousands of steps). A run here has ~200
#: steps (12 epochs of 16 batches), after which 0.99's statistics are still mostly their initial
#: (0, 1): in eval mode the network answered one constant probability for every image (3-fold
#: cross-validation on palm-mini: AUC 0.48). 0.9 is Paddle's default, as in every other network here.
BN_MOMENTUM = 0.9


def _mobilenet_v3(factory: Callable[..., nn.Layer]) -> Callable[..., nn.Layer]:
    def build(image_size: int = 224, **kw) -> nn.Layer:
        model = factory(num_classes=1, **kw)
        for layer in model.sublayers():
            if isinstance(layer, nn.BatchNorm2D):
                layer._momentum = BN_MOMENTUM
        return model

    return build


MODELS: dict[str, ModelSpec] = {
    "lenet": ModelSpec(lambda image_size=224, **kw: LeNet(image_size, **kw), "features"),
    "alexnet": ModelSpec(lambda image_size=224, **kw: AlexNet(image_size, **kw), "features", tunable=("dropout",)),
    "vgg16": ModelSpec(vgg16, "features"),
    "googlenet": ModelSpec(lambda image_size=224, **kw: GoogLeNet(image_size, **kw), "inception5b"),
    "resnet50": ModelSpec(_paddle(pvm.resnet50), "layer4"),
    "resnet101": ModelSpec(_paddle(pvm.resnet101), "layer4"),
    "resnet152": ModelSpec(_paddle(pvm.resnet152), "layer4"),
    "senet18": ModelSpec(senet18, "layer4"),
    "mobilenetv3_small": ModelSpec(_mobilenet_v3(pvm.mobilenet_v3_small), "lastconv"),
    "mobilenetv3_large": ModelSpec(_mobilenet_v3(pvm.mobilenet_v3_large), "lastconv"),
    "shufflenetv2": ModelSpec(_paddle(pvm.shufflenet_v2_x1_0), "_last_conv"),
}


# Networks whose classifier dropout rate is a training parameter (``dropout`` in params.yaml).
DROPOUT_MODELS: tuple[str, ...] = tuple(name for name, spec in MODELS.items() if "dropout" in spec.tunable)


def model_names() -> list[str]:
    return list(MODELS)


def spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    return MODELS[name]


def build_model(name: str, image_size: int = 224, **kwargs) -> nn.Layer:
    return spec(name).build(image_size=image_size, **kwargs)


def training_memory(name: str, image_size: int, batch_size: int, **kwargs) -> int:
    """Bytes that training ``name`` at ``image_size`` on batches of ``batch_size`` needs, roughly,
    measured on copies built at two small sides and scaled (no network is built at
    ``image_size``; the caller's random state and parameter names are untouched): the weights
    eight times over (gradients, two optimizer moments, weight average, checkpoint copies) and
    the activations of a batch three times (kept for the backward pass, their gradients)."""
    sides = (64, 96)
    params, acts = [], []
    rng = paddle.get_rng_state()
    with paddle.utils.unique_name.guard(), paddle.no_grad():
        for side in sides:
            model = build_model(name, image_size=side, **kwargs)
            model.eval()
            total = [0]

            def count(layer, inputs, output, total=total):
                for t in output if isinstance(output, (tuple, list)) else (output,):
                    if isinstance(t, paddle.Tensor):
                        total[0] += int(np.prod(t.shape))

            hooks = [m.register_forward_post_hook(count) for m in model.sublayers() if not m.sublayers()]
            model(paddle.zeros([1, 3, side, side]))
            for h in hooks:
                h.remove()
            params.append(sum(int(np.prod(p.shape)) for p in model.parameters()))
            acts.append(total[0])
    paddle.set_rng_state(rng)
    scale = (image_size / sides[1]) ** 2
    growth = (params[1] - params[0]) / (sides[1] ** 2 - sides[0] ** 2)  # weights that grow with the side (LeNet's fc)
    n_params = max(params[1] + growth * (image_size**2 - sides[1] ** 2), params[0])
    return int(4 * (8 * n_params + 3 * batch_size * acts[1] * scale))


def gradcam_layer(name: str, model: nn.Layer) -> nn.Layer:
    """The layer whose output feature maps Grad-CAM explains: the last convolutional stage."""
    return getattr(model, spec(name).gradcam_layer)


def main_logits(output) -> paddle.Tensor:
    """The main (N, 1) logits, whether the model returned a tensor or GoogLeNet's tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


def training_loss(output, labels, loss_fn) -> paddle.Tensor:
    """``loss_fn`` on the main output, plus 0.3 x each auxiliary classifier's loss (GoogLeNet)."""
    if isinstance(output, (tuple, list)):
        main, *aux = output
        return loss_fn(main, labels) + AUX_WEIGHT * sum(loss_fn(a, labels) for a in aux)
    return loss_fn(output, labels)
