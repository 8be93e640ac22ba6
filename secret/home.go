package secret

import (
	"errors"
	"path/filepath"
)

// HomeFromEnv finds the data folder the way every pullsecret binary does:
// $PULLSECRET_HOME, else $XDG_DATA_HOME/pullsecret, else
// $HOME/.local/share/pullsecret.
func HomeFromEnv(getenv func(string) string) (string, error) {
	if h := getenv("PULLSECRET_HOME"); h != "" {
		return h, nil
	}
	if x := getenv("XDG_DATA_HOME"); x != "" {
		return filepath.Join(x, "pullsecret"), nil
	}
	if h := getenv("HOME"); h != "" {
		return filepath.Join(h, ".local", "share", "pullsecret"), nil
	}
	return "", errors.New("no data folder: set PULLSECRET_HOME")
}

// OpenFromEnv opens the store in the folder HomeFromEnv names, with the key
// file from $PULLSECRET_KEY_FILE if set.
func OpenFromEnv(getenv func(string) string, opts ...Option) (*Store, error) {
	home, err := HomeFromEnv(getenv)
	if err != nil {
		return nil, err
	}
	opts = append([]Option{WithKeyFile(getenv("PULLSECRET_KEY_FILE"))}, opts...)
	return Open(home, opts...)
}
