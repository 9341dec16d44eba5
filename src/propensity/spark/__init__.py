"""The Spark engine: features, training frames and bulk scoring on a cluster.

Import the submodules (``propensity.spark.features``, ``.training``, ``.score``);
only ``propensity.spark.session`` imports pyspark, an optional extra.
"""
