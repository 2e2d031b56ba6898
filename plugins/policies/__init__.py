"""The built-in delegation policies (`frequency`, `completion_time`) and the helpers they share,
which third-party policies may import too."""
