package proxy_test

import (
	"testing"

	"github.com/pullsecret/pullsecret/proxy"
	"github.com/pullsecret/pullsecret/proxy/proxytest"
)

// TestFileTokenBackendContract: the data folder's token file meets the
// contract every backend does; its handles are processes sharing the
// folder.
func TestFileTokenBackendContract(t *testing.T) {
	t.Parallel()
	proxytest.TestTokenBackend(t, func(t *testing.T, n int) []proxy.TokenBackend {
		home := t.TempDir()
		out := make([]proxy.TokenBackend, n)
		for i := range out {
			b, err := proxy.NewFileTokenBackend(home, nil)
			if err != nil {
				t.Fatal(err)
			}
			out[i] = b
		}
		return out
	})
}
