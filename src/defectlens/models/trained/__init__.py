"""Shared machinery of detectors trained on synthetic anomalies (DRAEM, DeSTSeg): losses, the
anomaly sampler, the training loop, layers, and the Detector around them. Not a method itself."""

from .detector import TrainedDetector
from .layers import conv_block
from .loop import train_steps
from .losses import focal_loss, gaussian_window, pixel_weights, ssim
from .sampler import AnomalySampler

__all__ = ["AnomalySampler", "TrainedDetector", "conv_block", "focal_loss", "gaussian_window", "pixel_weights", "ssim",
           "train_steps"]
