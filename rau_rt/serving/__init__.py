"""The central localizer server (ARCHITECTURE.md "Scale-out"): a bundle's VLM localizer
behind Triton Inference Server for many towers. `service` answers requests (Triton aside),
`server` binds it through PyTriton (`rau-rt serve-localizer`), `repository` writes a model
repository for a production tritonserver (`rau-rt triton-repo`) whose Python-backend model is
`python_backend`, `environment` makes the server's own virtual environment. The client is
`rau_rt.localization.remote.RemoteLocalizer`.

Importing it loads neither PyTriton nor tritonclient.
"""
