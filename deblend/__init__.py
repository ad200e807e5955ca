"""deblend: weak-lensing galaxy deblending with a beta-VAE and an ellipticity regressor."""
