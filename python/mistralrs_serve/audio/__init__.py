"""Voice in and out: audio decoding and encoding (`codecs.py`), Piper text to
speech (`speech.py`) and Whisper speech to text through faster-whisper
(`transcription.py`)."""
