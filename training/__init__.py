"""training package of deblend."""
