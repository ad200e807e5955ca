"""BTK scene simulation and the dataset format of deblend."""
