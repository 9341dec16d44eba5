"""propensity: churn, purchase-propensity and next-best-action models on behavioral events."""

__version__ = "0.1.0"
