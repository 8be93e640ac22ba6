package main

import (
	"bytes"
	"context"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pullsecret/pullsecret/credhelper/kubelet"
)

func TestRunFlags(t *testing.T) {
	t.Parallel()
	home := filepath.Join(t.TempDir(), "home")
	env := func(k string) string {
		if k == "PULLSECRET_HOME" {
			return home
		}
		return ""
	}
	req := `{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderRequest","image":"ghcr.io/acme/app:1"}`
	for _, tc := range []struct {
		args    []string
		stdin   string
		wantErr string
		wantOut string
	}{
		{args: []string{"--version"}, wantOut: "pullsecret-credential-provider"},
		{args: []string{"--timeout", "2m"}, stdin: req, wantErr: "at most 50s"},
		{args: []string{"extra"}, stdin: req, wantErr: `unexpected argument "extra"`},
		{args: []string{"--server", "ftp://x"}, stdin: req, wantErr: "want an http:// or https:// URL"},
		{args: []string{"--server", "https://u:p@x"}, stdin: req, wantErr: "user info"},
		{args: []string{"--server", "https://x", "--ca-file", "/nonexistent"}, stdin: req, wantErr: "CA file"},
		{stdin: `{"kind":"CredentialProviderRequest"}`, wantErr: "apiVersion"},
		// Local mode, empty store: an empty, uncached answer.
		{stdin: req, wantOut: `"auth"`},
	} {
		var out, errb bytes.Buffer
		err := run(context.Background(), tc.args, env, strings.NewReader(tc.stdin), &out, &errb)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("%v: error %v, want %q", tc.args, err, tc.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("%v: %v", tc.args, err)
			continue
		}
		if tc.wantOut == `"auth"` {
			if strings.Contains(out.String(), `"auth"`) || !strings.Contains(out.String(), `"cacheDuration":"0s"`) || !strings.Contains(out.String(), kubelet.ResponseKind) {
				t.Errorf("empty store answered %s", out.String())
			}
			continue
		}
		if !strings.Contains(out.String(), tc.wantOut) {
			t.Errorf("%v: output %q", tc.args, out.String())
		}
	}
}
