"""What a run hands over: the report, the RAM training export, and `explain`."""
