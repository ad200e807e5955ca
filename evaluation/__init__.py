"""evaluation package of deblend."""
