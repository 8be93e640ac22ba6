// Package secret holds image pull secrets: the model, the sealed store and
// the resolution of (project, registry, repository) to a credential.
package secret

import (
	"errors"
	"fmt"
	"time"
)

// Kind says what a secret's value is.
type Kind string

const (
	// Basic is a username and password.
	Basic Kind = "basic"
	// Token is an identity (refresh) token, handed to clients with the
	// username "<token>" as the docker-credential-helpers protocol defines.
	Token Kind = "token"
	// ECR is an AWS identity (keys, a role, a profile or the default chain)
	// exchanged at pull time for an Amazon ECR registry token; see ecr.go.
	ECR Kind = "ecr"
)

// DefaultProject is the project used when none is given.
const DefaultProject = "default"

// ErrNotFound is returned when no secret matches.
var ErrNotFound = errors.New("pull secret not found")

// ErrExists is returned when creating a secret whose name is taken.
var ErrExists = errors.New("pull secret already exists")

// Secret is a pull secret's metadata. It never carries the value.
type Secret struct {
	Project    string    `json:"project"`
	Name       string    `json:"name"`
	Kind       Kind      `json:"kind"`
	Registries []Pattern `json:"registries"`
	Version    int       `json:"version"`
	Created    time.Time `json:"created"`
	Updated    time.Time `json:"updated"`
}

// Value is a secret's sealed content.
type Value struct {
	Username string `json:"username,omitempty"`
	Password string `json:"password,omitempty"`
	// IdentityToken is set for Kind Token.
	IdentityToken string `json:"identity_token,omitempty"`

	// The AWS fields are for Kind ECR; every one is optional. With no keys
	// and no profile the AWS default credential chain is used.
	AWS *AWSValue `json:"aws,omitempty"`
}

// AWSValue says which AWS identity an ECR secret exchanges for registry
// tokens. It is part of the sealed value.
type AWSValue struct {
	AccessKeyID     string `json:"access_key_id,omitempty"`
	SecretAccessKey string `json:"secret_access_key,omitempty"`
	// RoleARN is assumed through STS (with ExternalID, if set) using the
	// keys, the profile or the default chain.
	RoleARN    string `json:"role_arn,omitempty"`
	ExternalID string `json:"external_id,omitempty"`
	// Profile names a profile of the shared AWS config files.
	Profile string `json:"profile,omitempty"`
	// Region is for registry patterns that are not ECR host names (a
	// mirror, an alias); an ECR host names its own.
	Region string `json:"region,omitempty"`
}

// String never prints the value.
func (AWSValue) String() string { return "secret.AWSValue{REDACTED}" }

// GoString keeps %#v from leaking the value.
func (a AWSValue) GoString() string { return a.String() }

// String never prints the value, so a stray %v cannot leak it.
func (Value) String() string { return "secret.Value{REDACTED}" }

// GoString keeps %#v from leaking the value too.
func (v Value) GoString() string { return v.String() }

// Credential is what a client presents to a registry.
type Credential struct {
	Username string
	Password string
	// IdentityToken, when set, is exchanged by the client for a registry
	// token (OAuth2 refresh_token grant).
	IdentityToken string
	// Expires is when the credential stops working; zero if it does not.
	Expires time.Time
}

// String never prints the credential.
func (Credential) String() string { return "secret.Credential{REDACTED}" }

// GoString keeps %#v from leaking the credential.
func (c Credential) GoString() string { return c.String() }

// Credential turns a stored value into what a client presents.
func (v Value) Credential() Credential {
	return Credential{Username: v.Username, Password: v.Password, IdentityToken: v.IdentityToken}
}

// ValidName reports whether s is a valid secret or project name: a
// lowercase DNS label (RFC 1123), as Kubernetes names its objects.
func ValidName(s string) error {
	if !isLabel(s) {
		return fmt.Errorf("invalid name %q: use lowercase letters, digits and '-', start and end with a letter or digit, at most 63 characters", s)
	}
	return nil
}

// Validate checks a secret's metadata and value before it is stored.
func Validate(s Secret, v Value) error {
	if err := ValidName(s.Project); err != nil {
		return fmt.Errorf("project: %w", err)
	}
	if err := ValidName(s.Name); err != nil {
		return fmt.Errorf("secret: %w", err)
	}
	if len(s.Registries) == 0 {
		return fmt.Errorf("secret %s: at least one registry is required", s.Name)
	}
	seen := map[Pattern]bool{}
	for _, p := range s.Registries {
		if seen[p] {
			return fmt.Errorf("secret %s: registry %s given twice", s.Name, p)
		}
		seen[p] = true
	}
	switch s.Kind {
	case Basic:
		if v.Username == "" || v.Password == "" {
			return fmt.Errorf("secret %s: a basic secret needs a username and a password", s.Name)
		}
		if v.IdentityToken != "" {
			return fmt.Errorf("secret %s: a basic secret has no identity token", s.Name)
		}
		if v.AWS != nil {
			return fmt.Errorf("secret %s: a basic secret has no AWS identity", s.Name)
		}
	case Token:
		if v.IdentityToken == "" {
			return fmt.Errorf("secret %s: a token secret needs a token", s.Name)
		}
		if v.Password != "" {
			return fmt.Errorf("secret %s: a token secret has no password", s.Name)
		}
		if v.AWS != nil {
			return fmt.Errorf("secret %s: a token secret has no AWS identity", s.Name)
		}
	case ECR:
		if err := validateECR(s, v); err != nil {
			return fmt.Errorf("secret %s: %w", s.Name, err)
		}
	default:
		return fmt.Errorf("secret %s: unknown kind %q (want basic, token or ecr)", s.Name, s.Kind)
	}
	return nil
}

// isLabel matches ^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$ without the regexp
// package, whose start-up cost the helper process would pay on every pull.
func isLabel(s string) bool {
	if len(s) == 0 || len(s) > 63 || s[0] == '-' || s[len(s)-1] == '-' {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}
