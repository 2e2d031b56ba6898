"""An emulated GPU inference engine: the OpenAI API and vLLM's /metrics in front of a timing model.

`wwwserve emulate-engine --profile NAME --port P` serves it. `profiles` holds the hardware/model
profiles (and where their numbers come from), `engine` the continuous-batching timing model (pure,
in virtual seconds), `runtime` drives that model in real time (divided by a time scale), and `server`
is the HTTP layer. docs/emulator.md describes the model and its sources.
"""
