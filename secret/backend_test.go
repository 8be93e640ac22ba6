package secret_test

import (
	"path/filepath"
	"testing"

	"github.com/pullsecret/pullsecret/secret"
	"github.com/pullsecret/pullsecret/secret/secrettest"
)

// TestFileBackendContract: the data folder's file meets the contract every
// backend does; its handles are processes sharing one folder.
func TestFileBackendContract(t *testing.T) {
	t.Parallel()
	secrettest.TestBackend(t, func(t *testing.T, n int) []secret.Backend {
		home := filepath.Join(t.TempDir(), "home")
		out := make([]secret.Backend, n)
		for i := range out {
			out[i] = secret.NewFileBackend(home)
		}
		return out
	})
}
