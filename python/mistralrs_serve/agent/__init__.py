"""The agentic runtime: server-side tools and the loop that runs them between generation rounds."""
