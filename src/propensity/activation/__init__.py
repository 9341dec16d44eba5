"""Activation: triggered decisions and live segments from the event stream."""
