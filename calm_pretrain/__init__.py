"""calm-pretrain: distributed pretraining of Continuous Autoregressive Language Models."""
__version__ = "0.1.0"
