"""benchmarks package of deblend."""
