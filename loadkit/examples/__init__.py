"""Example jobs shipped with loadkit; the engine never imports them."""
