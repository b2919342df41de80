"""Weights of the reference models (vqz.pipelines.reference), one diffusers folder per model."""
