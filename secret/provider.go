package secret

import "context"

// Provider turns a stored secret into a registry credential at pull time.
// Static secrets return what is stored; others (ECR) exchange it for a
// short-lived registry token.
type Provider interface {
	Credential(ctx context.Context, s Secret, v Value, t Target) (Credential, error)
}

// Static is the provider of basic and token secrets.
type Static struct{}

// Credential returns the stored value.
func (Static) Credential(_ context.Context, _ Secret, v Value, _ Target) (Credential, error) {
	return v.Credential(), nil
}
