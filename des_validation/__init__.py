"""des_validation package of deblend."""
