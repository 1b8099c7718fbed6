"""Protocol adapters: parse the request, lease the model, proxy to Triton. No lifecycle logic here."""
