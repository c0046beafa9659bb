"""`prism curate`: teacher demonstrations (Gemini, OpenAI-compatible, local, oracle), aimed at what the
student cannot solve, collected through a resumable, rate-limited, cached pipeline."""
