"""Tools around runs that are not part of training: reading offline W&B runs back."""
