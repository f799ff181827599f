"""Independent references for the closed-form probe."""


def autograd_reference(z, head, loss_fn):
    """||dL/dW||, ||dL/db|| and L by backward through the head alone on detached features."""
    head.zero_grad()
    loss = loss_fn(head(z.detach()))
    loss.backward()
    gb = head.bias.grad.norm().item() if head.bias is not None else 0.0
    return head.weight.grad.norm().item(), gb, loss.item()
