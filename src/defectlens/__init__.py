"""defectlens: industrial visual anomaly detection on a CPU."""

__version__ = "0.1.0"
