"""NMoE benchmark suites (``nmoe bench <suite>``): accuracy, overhead, comm, scaling, serve."""
