"""The vision side: Swin + RAM / RAM++ tagging models, preprocessing, training."""
